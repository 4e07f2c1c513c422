"""Test-wide settings and fixtures.

The tests run tiny models, where torch's thread pool costs more than it saves, and on a
machine busy with other work two spinning OpenMP threads per process made a 15 s test
take minutes. One thread keeps the suite fast and its timings steady.
"""

import datetime
import sys
import types

import pytest
import torch

torch.set_num_threads(1)


class _StandInMeta(type):
    """isinstance/issubclass against a stand-in class answer as for the real class it
    stands in for, so code that checks ``isinstance(x, date)`` accepts the real dates it gets."""

    def __instancecheck__(cls, obj):
        return isinstance(obj, cls.__bases__[0])

    def __subclasscheck__(cls, sub):
        return issubclass(sub, cls.__bases__[0])


@pytest.fixture
def shift_clock(monkeypatch):
    """``shift_clock(days)`` moves today, as faker and privtune see it, by ``days``:
    ``datetime.now``/``today``/``utcnow`` and ``date.today`` in every faker and privtune
    module already imported, whether it imported the classes (``from datetime import
    date``) or the module. Undone after the test. Import (and use) what is to be tested
    first: a module imported after the shift sees the real clock."""

    def shift(days: int) -> None:
        delta = datetime.timedelta(days=days)

        class ShiftedDatetime(datetime.datetime, metaclass=_StandInMeta):
            @classmethod
            def now(cls, tz=None):
                return datetime.datetime.now(tz) + delta

            @classmethod
            def today(cls):
                return datetime.datetime.today() + delta

            @classmethod
            def utcnow(cls):
                return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) + delta

        class ShiftedDate(datetime.date, metaclass=_StandInMeta):
            @classmethod
            def today(cls):
                return datetime.date.today() + delta

        shim = types.ModuleType("datetime")
        shim.__dict__.update(vars(datetime))
        shim.datetime, shim.date = ShiftedDatetime, ShiftedDate
        stand_ins = {id(datetime.datetime): ShiftedDatetime, id(datetime.date): ShiftedDate, id(datetime): shim}
        for name, module in list(sys.modules.items()):
            if module is None or name.split(".")[0] not in ("faker", "privtune"):
                continue
            for attr, value in list(vars(module).items()):
                if id(value) in stand_ins:
                    monkeypatch.setattr(module, attr, stand_ins[id(value)])

    return shift
