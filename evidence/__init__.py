"""SOX evidence: the reports an auditor samples (CSV with a manifest) and the signed checkpoints of
the audit chain. Read only: it reads the models, the selectors and the chain, and writes nothing but
its own audit event (an export is evidence too)."""
