"""Alarm rules, the alarm lifecycle and escalation (the stream-processing issue); empty until it lands."""
