"""The provider's Airflow plugin: the edits' images in Airflow's UI (see :mod:`.kontext`)."""
