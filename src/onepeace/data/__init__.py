"""Input preprocessing: text (:mod:`.tokenizer`), images (:mod:`.image`) and audio (:mod:`.audio`).

The submodules are imported on demand so that importing :mod:`onepeace.data` stays cheap.
"""
