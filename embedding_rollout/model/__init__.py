"""The embedding generator's model: a Keras text encoder exported as a TF Serving SavedModel."""
