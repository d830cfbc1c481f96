"""The Lightning glue: :class:`MaxUpMixin`, the :class:`MaxUp` callback and their helpers."""
