"""Event-sequence generator: a patient's longitudinal event table from their patient row."""
from .constraints import EVENT_COLUMNS, order_violations, patient_consistency
from .model import EventModel, EventModelError

__all__ = ["EVENT_COLUMNS", "EventModel", "EventModelError", "order_violations", "patient_consistency"]
