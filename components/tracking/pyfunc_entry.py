"""Entry file MLflow loads for a registered genpipe model ("models from code")."""
from mlflow.models import set_model

from components.tracking.pyfunc_model import GeneratorModel

set_model(GeneratorModel())
