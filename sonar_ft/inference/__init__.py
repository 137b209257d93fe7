"""Using a fine-tuned encoder: SignHiera features from videos (``extract``), sentence embeddings of clips
(``embed``) and translation into any of SONAR's languages (``translate``, from features or videos). Imports data, models and export.
"""
