"""Using a fine-tuned encoder: sentence embeddings of clips (``embed``) and translation into any of SONAR's
languages (``translate``). Imports data, models and export.
"""
