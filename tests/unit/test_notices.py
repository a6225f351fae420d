"""What the notice mailer writes for each kind of tenant event."""

from sensormine.metering.notices import render


def test_quota_notices_say_what_is_near_or_past_the_plans_limit() -> None:
    data = {"metric": "storage_bytes", "threshold_percent": 80, "used": 850_000_000, "limit": 10**9, "plan": "free"}
    subject, text = render("acme", "quota.storage.warning", data)
    assert "Storage at 80 % of the free plan's limit: 0.85 GB of 1.00 GB." in text
    assert subject.startswith("[Sensormine] acme: Storage at 80 % of the free plan's limit")
    devices = {"metric": "devices", "threshold_percent": 100, "used": 10, "limit": 10, "plan": "free"}
    _, text = render("acme", "quota.devices.exceeded", devices)
    assert "The free plan's limit of 10 devices is reached (10 used): further devices are refused" in text
    full = {**data, "threshold_percent": 100, "used": 1_200_000_000}
    _, text = render("acme", "quota.storage.exceeded", full)
    assert "limit of 1.00 GB storage is reached (1.20 GB stored): new readings are refused and kept in the " in text


def test_billing_notices_carry_their_own_sentence() -> None:
    subject, text = render("acme", "billing.trial_will_end", {"message": "The trial ends on 2026-12-07. Add a card."})
    assert subject == "[Sensormine] acme: The trial ends on 2026-12-07" and text.startswith("The trial ends")
