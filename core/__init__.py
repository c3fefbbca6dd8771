"""What every layer shares and nothing else: the user-facing errors and their one-line form, and the
declaration of a config key with its meaning. No JAX here."""
