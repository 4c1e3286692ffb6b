"""One module per detector. Each is a plain callable: `detector(rgb_uint8, **options) -> HxWx3 uint8 map`.

Networks are injected through the constructor (tests pass tiny random ones); `from_weights(folder)`
loads the real ones from a local folder and never reaches the network.
"""
