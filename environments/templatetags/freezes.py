"""`{% coming_freezes %}`: the freeze calendar's data for any page that includes
`admin/environments/freeze_calendar.html`, so a page shows it without its view knowing."""

from django import template

from environments import selectors

register = template.Library()


@register.simple_tag
def coming_freezes(application=None, days: int = selectors.CALENDAR_DAYS):
    """The coming freezes per application (an Application, a name, or none for all). Two queries."""
    return selectors.freeze_calendar(application=application or None, days=days)
