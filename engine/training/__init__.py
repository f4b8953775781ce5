"""Training and evaluation of UltraFastBERT students: the text corpus, distillation, closed-form FFF fitting and the
fidelity evaluation. Serving never imports this package (``tests`` check it)."""
