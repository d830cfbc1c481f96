"""Diagnostic callbacks: what MaxUp selects (:class:`SelectionMonitor`) and epoch timing."""
