"""Everything that talks to the outside world (MLLP sockets, FHIR servers, messaging providers),
each behind a small ``typing.Protocol``. Imports nothing of careloop's but plain config types."""
