"""One module per trigger family; each registers its Attack subclass with ``@register_attack``."""
