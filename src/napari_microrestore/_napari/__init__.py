"""npe2 contributions (reader, sample data, widgets); napari and Qt are imported only here."""
