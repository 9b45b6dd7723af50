from django.contrib import admin
from django.urls import path
from django.views.generic import RedirectView

from portal.api import PREFIX, api

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="admin:index", permanent=False)),
    path(PREFIX.lstrip("/"), api.urls),
    path("admin/", admin.site.urls),
]

handler400 = "portal.api.bad_request"
handler403 = "edge.site.permission_denied"
handler404 = "edge.site.page_not_found"
