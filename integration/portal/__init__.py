"""The patient page: careloop's own portal channel, reached by signed, expiring links."""
