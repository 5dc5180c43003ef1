"""One module per technique; each registers its pass with ``service.engine.registry.register``."""
