"""MLflow: training runs with live metrics, the pyfunc that serves samples, registry and promotion."""
