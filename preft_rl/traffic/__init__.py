"""Live traffic: what a server records of each tenant's requests and feedback, for training on it (issue 33)."""

from .store import FeedbackError, FeedbackRow, SqliteTrafficStore, TrafficRecord, TrafficStore

__all__ = ["FeedbackError", "FeedbackRow", "SqliteTrafficStore", "TrafficRecord", "TrafficStore"]
