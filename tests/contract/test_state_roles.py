"""Every store class provides every role port (application/ports.py), checked twice: statically by mypy (the
assignments below) and at run time by comparing each role's members with the class's."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from adapters.outbound.memcached_store import MemcachedStateStore
from adapters.outbound.memory_store import MemoryStateStore
from application.failover_store import FailoverStateStore
from application.ports import (
    ConversationStore,
    CursorStore,
    CustomerCounters,
    CustomerNotes,
    Inbox,
    KfRegistry,
    MessageHandling,
    MessageLedger,
    ProfileStore,
    PullCoordination,
    StateStore,
    StoreAdmin,
)

ROLES: tuple[type[Any], ...] = (
    ConversationStore,
    MessageLedger,
    Inbox,
    MessageHandling,
    CursorStore,
    PullCoordination,
    KfRegistry,
    StoreAdmin,
    CustomerCounters,
    CustomerNotes,
    ProfileStore,
)
STORES: tuple[type[Any], ...] = (MemoryStateStore, MemcachedStateStore, FailoverStateStore)


def _every_role_of(store: MemoryStateStore | MemcachedStateStore | FailoverStateStore) -> list[object]:
    """Never called: mypy checks that each store type is assignable to each role (and to the whole)."""
    conversations: ConversationStore = store
    ledger: MessageLedger = store
    inbox: Inbox = store
    handling: MessageHandling = store
    cursors: CursorStore = store
    pulls: PullCoordination = store
    kfs: KfRegistry = store
    admin: StoreAdmin = store
    counters: CustomerCounters = store
    notes: CustomerNotes = store
    everything: StateStore = store
    return [conversations, ledger, inbox, handling, cursors, pulls, kfs, admin, counters, notes, everything]


def _members(role: type[Any]) -> list[str]:
    """The role's own members (its methods and properties), as a use case would call them."""
    return [
        name
        for name, value in vars(role).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    ]


def test_every_role_has_members_and_the_whole_store_is_every_role() -> None:
    assert all(_members(role) for role in ROLES)
    assert set(StateStore.__mro__) >= set(ROLES)
    covered = {name for role in ROLES for name in _members(role)}
    assert covered == {name for name in dir(StateStore) if not name.startswith("_")}


@pytest.mark.parametrize("store_class", STORES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.__name__)
def test_each_store_provides_each_role(store_class: type[Any], role: type[Any]) -> None:
    for name in _members(role):
        wanted = vars(role)[name]
        provided = inspect.getattr_static(store_class, name, None)
        assert provided is not None, f"{store_class.__name__} lacks {role.__name__}.{name}"
        if isinstance(wanted, property):
            assert not callable(provided) or isinstance(provided, property), name
            continue
        assert inspect.iscoroutinefunction(provided), f"{store_class.__name__}.{name} is not async"
        expected = inspect.signature(wanted)
        actual = inspect.signature(provided)
        assert [(p.name, p.kind) for p in actual.parameters.values()] == [
            (p.name, p.kind) for p in expected.parameters.values()
        ], f"{store_class.__name__}.{name}{actual} differs from {role.__name__}.{name}{expected}"
        defaults = {p.name: p.default for p in expected.parameters.values()}
        assert {p.name: p.default for p in actual.parameters.values()} == defaults, name
