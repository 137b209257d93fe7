"""The notebooks' ``from sonar_ft import colab``: a short re-export of :mod:`sonar_ft.notebook.colab`.

Display code only: importing it never imports torch, fairseq2 or sonar.
"""

from sonar_ft.notebook.colab import *  # noqa: F401,F403
