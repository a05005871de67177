# The libzmq functions the compiled code uses, as _zmqdl.h declares them: resolved at
# import through pyzmq's own extension module (fbz_load), so they act on pyzmq's
# bundled libzmq and no second copy is ever linked. Shared by fastbroker._core, the worker's
# compiled session (fastbroker.worker._session), the client's wire (fastbroker.client._wire)
# and the benchmarks' load generators (bench/_loadgen.pyx).

cdef extern from "_zmqdl.h" nogil:
    ctypedef struct zmsg "fb_zmq_msg_t":
        pass
    ctypedef struct zpollitem "fb_zmq_pollitem_t":
        void *socket
        int fd
        short events
        short revents
    int ZPOLLIN "FBZ_POLLIN"
    int ZPOLLOUT "FBZ_POLLOUT"
    int ZDONTWAIT "FBZ_DONTWAIT"
    int ZSNDMORE "FBZ_SNDMORE"
    int ZETERM "FBZ_ETERM"
    int zmsg_init "fbz_msg_init"(zmsg *m)
    int zmsg_init_size "fbz_msg_init_size"(zmsg *m, size_t size)
    ctypedef void zfree_fn "fbz_free_fn"(void *data, void *hint)
    int zmsg_init_data "fbz_msg_init_data"(zmsg *m, void *data, size_t size, zfree_fn *free_fn, void *hint)
    void *zmsg_data "fbz_msg_data"(zmsg *m)
    size_t zmsg_size "fbz_msg_size"(const zmsg *m)
    int zmsg_more "fbz_msg_more"(const zmsg *m)
    int zmsg_close "fbz_msg_close"(zmsg *m)
    int zmsg_copy "fbz_msg_copy"(zmsg *dest, zmsg *src)
    int zmsg_move "fbz_msg_move"(zmsg *dest, zmsg *src)
    int zmsg_send "fbz_msg_send"(zmsg *m, void *socket, int flags)
    int zmsg_recv "fbz_msg_recv"(zmsg *m, void *socket, int flags)
    int zpoll "fbz_poll"(zpollitem *items, int n, long timeout)
    int zerrno "fbz_errno"()
    void *zsocket "fbz_socket"(void *context, int kind)
    int zclose "fbz_close"(void *socket)
    int zconnect "fbz_connect"(void *socket, const char *address)
    int zsetsockopt "fbz_setsockopt"(void *socket, int option, const void *value, size_t size)
    const char *fbz_load(const char *path)
