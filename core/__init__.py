"""The shared kernel under every layer: the shape of decisions and refusals, and how times are
written. It imports nothing of the portal's apps, so every layer may import it."""
