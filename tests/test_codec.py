import pytest

from qkv_core.codec.registry import LayerCodec, resolve
from qkv_core.codec.tensor_codec import Granularity, TensorCodec


def test_presets():
    assert resolve("fp16", 2) == [LayerCodec(TensorCodec(16), TensorCodec(16))] * 2
    assert resolve("int8", 1)[0].key == TensorCodec(8, Granularity.PER_TOKEN)
    assert resolve("seed-4", 3)[2].value == TensorCodec(4, Granularity.PER_TENSOR)
    kivi = resolve("kivi-2", 1)[0]
    assert kivi.key == TensorCodec(2, Granularity.PER_CHANNEL)
    assert kivi.value == TensorCodec(2, Granularity.PER_TOKEN)


def test_spec_string():
    (layer,) = resolve("k=3/group/32;v=fp16;sink=4;recent=8", 1)
    assert layer.key == TensorCodec(3, Granularity.PER_GROUP, 32, 4, 8)
    assert layer.value == TensorCodec(16)


@pytest.mark.parametrize("name",
                         ["int4", "seed-9", "kivi-0", "k=4/row;v=4/token", "k=4/token", "k=4/token;v=4/token;x=1"])
def test_unknown_names_are_refused_clearly(name):
    with pytest.raises(ValueError):
        resolve(name, 2)
