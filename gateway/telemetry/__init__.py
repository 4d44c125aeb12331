"""What the gateway tells about itself: every `gateway_*` Prometheus series (metrics.py), the
requests by decision of the last hour (activity.py), what each settled request charged in the
metrics (charges.py), and one OpenTelemetry trace per request (tracing.py: the spans the request
path opens; export.py: getting them out of the process; their settings are
gateway.config.telemetry)."""
