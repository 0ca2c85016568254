"""``onepeace demo``: search the held-out demo corpus with the shipped model and report what it finds."""
