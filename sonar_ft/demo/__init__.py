"""The offline demo: a synthetic corpus, a miniature pretrained SONAR, and the `make demo` pipeline."""
