"""What the edges share (the admin's actions and pages, the API's routers): not an app, and no app
below imports it."""
