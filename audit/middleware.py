from auditlog.context import set_actor


class FieldHistoryActorMiddleware:
    """Tell django-auditlog who is changing settings in the admin.

    Unlike auditlog's own middleware it records REMOTE_ADDR, never the client-supplied
    X-Forwarded-For header (run behind a trusted proxy that sets REMOTE_ADDR, e.g. gunicorn's
    --forwarded-allow-ips).
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            with set_actor(user, remote_addr=request.META.get("REMOTE_ADDR")):
                return self.get_response(request)
        return self.get_response(request)
