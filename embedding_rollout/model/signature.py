"""The SavedModel's serving signature, shared by the trainer, the model server and the clients
(a module of its own: the clients must not import TensorFlow to know it)."""
SIGNATURE = "serving_default"
INPUT_KEY = "text"
OUTPUT_KEY = "embedding"
