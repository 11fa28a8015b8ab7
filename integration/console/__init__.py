"""The web console (``/console``): people sign in with a username and password (not API
clients), and see what flows through careloop. See :mod:`integration.console.users`,
:mod:`integration.console.auth` and :mod:`integration.console.pages`."""
