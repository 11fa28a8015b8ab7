"""Quiet hours, caps, channel and language choice."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from integration.outreach.policy import (
    ContactPoint,
    Recipient,
    cap_reached,
    choose_channel,
    choose_language,
    in_quiet_hours,
    next_allowed,
    normal_address,
)

NY = ZoneInfo("America/New_York")
QUIET = (time(21, 0), time(8, 0))


def ny(*args: int) -> datetime:
    return datetime(*args, tzinfo=NY)


class TestQuietHours:
    def test_evening_moves_to_next_morning(self) -> None:
        assert next_allowed(ny(2026, 3, 3, 22, 15), QUIET, NY) == ny(2026, 3, 4, 8, 0)

    def test_early_morning_moves_to_same_morning(self) -> None:
        assert next_allowed(ny(2026, 3, 3, 6, 0), QUIET, NY) == ny(2026, 3, 3, 8, 0)

    def test_daytime_untouched(self) -> None:
        moment = ny(2026, 3, 3, 12, 0)
        assert next_allowed(moment, QUIET, NY) == moment

    def test_window_keeps_wall_clock_across_spring_forward(self) -> None:
        """On the night clocks go forward (8 March 2026 in New York) 08:00 is still 08:00 local,
        which is 12:00 UTC instead of 13:00."""
        moved = next_allowed(ny(2026, 3, 7, 23, 0), QUIET, NY)
        assert moved.astimezone(NY).hour == 8
        assert moved.astimezone(ZoneInfo("UTC")).hour == 12

    def test_window_keeps_wall_clock_across_fall_back(self) -> None:
        moved = next_allowed(ny(2026, 10, 31, 23, 0), QUIET, NY)
        assert moved.astimezone(NY).replace(tzinfo=None) == datetime(2026, 11, 1, 8, 0)
        assert moved.astimezone(ZoneInfo("UTC")).hour == 13

    def test_read_in_the_patients_zone(self) -> None:
        """21:30 in New York is 02:30 in London: quiet for both, but judged in the patient's."""
        london = ZoneInfo("Europe/London")
        moment = datetime(2026, 6, 1, 16, 0, tzinfo=london)  # 11:00 in New York
        assert in_quiet_hours(moment, QUIET, NY) is False
        assert in_quiet_hours(datetime(2026, 6, 1, 22, 0, tzinfo=london), QUIET, london)

    @given(st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2027, 1, 1),
                        timezones=st.just(NY)))
    def test_result_never_quiet_and_never_earlier(self, moment: datetime) -> None:
        allowed = next_allowed(moment, QUIET, NY)
        assert allowed >= moment
        assert not in_quiet_hours(allowed, QUIET, NY)
        assert allowed - moment <= timedelta(hours=12)


class TestCaps:
    def test_one_a_day_in_local_days(self) -> None:
        others = [ny(2026, 3, 3, 9, 0)]
        assert cap_reached(ny(2026, 3, 3, 18, 0), others, tz=NY, max_per_day=1,
                           max_per_week=3)
        assert cap_reached(ny(2026, 3, 4, 9, 0), others, tz=NY, max_per_day=1,
                           max_per_week=3) is None

    def test_three_a_week_in_any_seven_days(self) -> None:
        others = [ny(2026, 3, 2, 9), ny(2026, 3, 4, 9), ny(2026, 3, 6, 9)]
        assert cap_reached(ny(2026, 3, 8, 9), others, tz=NY, max_per_day=1, max_per_week=3)
        assert cap_reached(ny(2026, 3, 9, 10), others, tz=NY, max_per_day=1,
                           max_per_week=3) is None
        # a later touch already scheduled counts too
        assert cap_reached(ny(2026, 2, 28, 9), others, tz=NY, max_per_day=1, max_per_week=3)


def recipient(**kw: object) -> Recipient:
    values: dict[str, object] = {"patient_id": "p", "timezone": NY}
    values.update(kw)
    return Recipient(**values)  # type: ignore[arg-type]


MOBILE = ContactPoint("phone", "+15550101", "mobile", 2)
HOME = ContactPoint("phone", "+15550102", "home", 1)
EMAIL = ContactPoint("email", "a@example.org", "home", 3)


class TestChannel:
    def test_named_channel(self) -> None:
        assert choose_channel("sms", recipient(telecom=(MOBILE,)), ()) == ("sms", "+15550101")

    def test_sms_never_to_a_landline(self) -> None:
        assert choose_channel("sms", recipient(telecom=(HOME,)), ()) == "no sms contact"

    def test_preferred_then_rank_then_fallback(self) -> None:
        r = recipient(telecom=(MOBILE, HOME, EMAIL), preferred_channel="email")
        assert choose_channel("preferred", r, ("sms",)) == ("email", "a@example.org")
        r = recipient(telecom=(MOBILE, HOME, EMAIL))
        assert choose_channel("preferred", r, ("email",)) == ("voice", "+15550102")

    def test_opted_out_channel_skipped(self) -> None:
        r = recipient(telecom=(MOBILE, EMAIL), preferred_channel="sms",
                      opted_out=frozenset({"sms"}))
        assert choose_channel("preferred", r, ("sms", "email")) == ("email", "a@example.org")
        assert choose_channel("sms", r, ()) == "opted out of sms"

    def test_opted_out_address_is_passed_over(self) -> None:
        """A number that replied STOP is not texted, whoever's record holds it: the next
        channel is used, and a named SMS step says why it has none."""
        spelled = ContactPoint("phone", "+1 (555) 0101", "mobile", 2)
        r = recipient(telecom=(spelled, EMAIL), preferred_channel="sms",
                      blocked=frozenset({("sms", "+15550101")}))
        assert choose_channel("preferred", r, ("sms", "email")) == ("email", "a@example.org")
        assert choose_channel("sms", r, ()) == "opted out of sms"
        assert choose_channel("voice", r, ()) == ("voice", "+1 (555) 0101")

    def test_another_mobile_still_reachable(self) -> None:
        """CTIA opt-outs are per number: a second mobile that did not opt out is used."""
        other = ContactPoint("phone", "+15550199", "mobile", 3)
        r = recipient(telecom=(MOBILE, other), blocked=frozenset({("sms", "+15550101")}))
        assert choose_channel("sms", r, ()) == ("sms", "+15550199")

    def test_preferred_reason_names_the_opt_out(self) -> None:
        r = recipient(telecom=(MOBILE,), blocked=frozenset({("sms", "+15550101")}))
        assert choose_channel("preferred", r, ("sms",)) == "no channel: sms: opted out"

    def test_no_channel_gives_reason(self) -> None:
        reason = choose_channel("preferred", recipient(), ("sms", "email"))
        assert isinstance(reason, str) and reason.startswith("no channel")


class TestNormalAddress:
    @pytest.mark.parametrize(("value", "expected"), [
        ("+1 (555) 555-0101", "+15555550101"), ("+1.555.555.0101", "+15555550101"),
        ("555 555 0101", "5555550101"), ("+44 20/7946 0958", "+442079460958"),
        (" Jane@Example.ORG ", "jane@example.org")])
    def test_spellings_of_one_address(self, value: str, expected: str) -> None:
        channel = "email" if "@" in value else "sms"
        assert normal_address(channel, value) == expected


class TestLanguage:
    def test_base_language_and_default(self) -> None:
        assert choose_language("es-MX", ["en", "es"], "en") == "es"
        assert choose_language("fr", ["en", "es"], "en") == "en"
        assert choose_language("", ["en", "es"], "es") == "es"
