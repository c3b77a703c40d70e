import pytest


@pytest.fixture
def notes():
    """napari notifications dispatched during the test, as (severity, message)."""
    from napari.utils.notifications import notification_manager

    got: list = []

    def record(event):
        got.append((event.severity, str(event.message)))

    notification_manager.notification_ready.connect(record)
    yield got
    notification_manager.notification_ready.disconnect(record)


@pytest.fixture(autouse=True)
def own_settings(tmp_path):
    """The widgets' persisted choices (QSettings, INI format) go to a fresh folder per test,
    never to the user's ~/.config."""
    from qtpy.QtCore import QSettings

    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path))
    yield tmp_path
