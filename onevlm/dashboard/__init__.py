"""The operator's page: the service's live state, recent routes, the review queue and calibration health."""
