"""Planning before a run: GPU memory per category (``memory``), disk (``disk``), settings that fit a GPU
(``recommend``, full fine-tuning and LoRA alike) and ``sonar-ft plan`` (``cli``).

The one model of memory and disk: the recipe's start-up check and the GPU check use it.
"""
