"""The edge server: lifecycle, health and admission (``server``), one peer per device
connection (``peer``), its counters and /metrics (``metrics``), generation sessions
(``sessions``) and the allow-list.

Imports ``protocol``, ``core`` and the top level only (never ``device``, ``split`` or ``lab``).
Import names from their modules.
"""
