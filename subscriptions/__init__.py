"""FHIR Subscription lifecycle: decides what to create, renew and catch up; ``adapters`` call."""
