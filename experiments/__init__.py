"""Research scripts run from the repository root (``python -m experiments...``)
or with the package installed; not part of the installed package."""
