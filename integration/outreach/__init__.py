"""Outreach: care pathways turned into scheduled, personalised touches.

* :mod:`.pathways`: the ``[[pathways]]`` and ``[outreach]`` settings (steps, filters, caps,
  quiet hours) and ISO 8601 offsets;
* :mod:`.planner`: pure: (pathways, a timeline entry, the patient, existing touches, now) → the
  touches that should exist, and the steps skipped with their reason;
* :mod:`.policy`: quiet hours, frequency caps, channel and language choice (pure, DST-safe);
* :mod:`.templates`: Jinja2 templates per step and language, Babel dates in the patient's
  locale and time zone, checked at start;
* :mod:`.sms`: GSM-7 / UCS-2 segment counting.

The reconciler (schedule, move, cancel in one transaction), the due sweep and the channels build
on these and live beside them.
"""
