"""genpipe components: pure, Prefect-free building blocks (data, models, training, evaluation, tracking, versioning)."""
