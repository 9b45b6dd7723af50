"""How the admin writes dates and times: ISO-like and short, so that lists fit an analyst's screen and
read the same as the audit chain and the CSV reports (times are UTC)."""

DATETIME_FORMAT = "Y-m-d H:i:s"
SHORT_DATETIME_FORMAT = "Y-m-d H:i"
DATE_FORMAT = "Y-m-d"
SHORT_DATE_FORMAT = "Y-m-d"
