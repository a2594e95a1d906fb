"""chainrule.wire: the codecs both sides of the wire use, beside the contract they encode.

* ``convert``: Tensor and AttrValue messages to numpy arrays and Python values, and back;
* ``outgoing``: a message plus its large tensors, carried as a :class:`~.outgoing.Carrier` decides
  (inside the message, hand-encoded for gRPC, kept in-process, in shared memory);
* ``incoming``: large tensors read as views of the received bytes;
* ``status``: typed errors to ``google.rpc.Status`` with rich details;
* ``shared_memory``: the files same-host peers hand tensors over in.

It needs numpy, protobuf and ``chainrule.core``'s errors; neither gRPC nor the server.
"""
