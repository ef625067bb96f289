from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_IMPRESSION: _ClassVar[EventType]
    EVENT_TYPE_CLICK: _ClassVar[EventType]
    EVENT_TYPE_RATING: _ClassVar[EventType]
    EVENT_TYPE_PURCHASE: _ClassVar[EventType]
    EVENT_TYPE_ADD_TO_CART: _ClassVar[EventType]
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_IMPRESSION: EventType
EVENT_TYPE_CLICK: EventType
EVENT_TYPE_RATING: EventType
EVENT_TYPE_PURCHASE: EventType
EVENT_TYPE_ADD_TO_CART: EventType

class UserEvent(_message.Message):
    __slots__ = ("event_id", "user_id", "item_id", "event_type", "event_time_ms", "value", "context", "label", "item_attributes")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ItemAttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    ITEM_ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    user_id: int
    item_id: int
    event_type: EventType
    event_time_ms: int
    value: float
    context: _containers.ScalarMap[str, str]
    label: int
    item_attributes: _containers.ScalarMap[str, str]
    def __init__(self, event_id: _Optional[str] = ..., user_id: _Optional[int] = ..., item_id: _Optional[int] = ..., event_type: _Optional[_Union[EventType, str]] = ..., event_time_ms: _Optional[int] = ..., value: _Optional[float] = ..., context: _Optional[_Mapping[str, str]] = ..., label: _Optional[int] = ..., item_attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...
