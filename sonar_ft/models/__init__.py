"""The models: the trainable SONAR ASL encoder (``encoder``, ``lora``) and the frozen SONAR text models
(``decoder``, ``text_encoder``) resolved through fairseq2's asset cards (``assets``), and the SignHiera video
model that makes the encoder's input features from videos (``signhiera``).

Knows nothing of training: imports only the base modules, :mod:`sonar_ft.files` and :mod:`sonar_ft.config`.
"""
