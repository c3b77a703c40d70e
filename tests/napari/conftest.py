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
