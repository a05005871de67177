/* The few libzmq entry points the compiled code needs, resolved at run time.
 *
 * pyzmq wheels ship no zmq.h and load their own private copy of libzmq with
 * RTLD_LOCAL.  A socket handle from pyzmq (Socket.underlying) is only valid with
 * that same copy, so instead of linking a second libzmq we look the functions up
 * through pyzmq's own extension module: dlsym() on a handle searches the
 * object's dependencies, which include pyzmq's libzmq.
 *
 * The two structs mirror zmq.h's ABI (stable since libzmq 4.x): zmq_msg_t is an
 * opaque, pointer-aligned 64-byte block; zmq_pollitem_t holds an int fd on POSIX.
 */
#ifndef FASTBROKER_ZMQDL_H
#define FASTBROKER_ZMQDL_H

#include <dlfcn.h>
#include <stddef.h>

typedef struct fb_zmq_msg_t {
    union {
        unsigned char bytes[64];
        void *align;
    } u;
} fb_zmq_msg_t;

typedef struct fb_zmq_pollitem_t {
    void *socket;
    int fd;
    short events;
    short revents;
} fb_zmq_pollitem_t;

#define FBZ_POLLIN 1
#define FBZ_POLLOUT 2
#define FBZ_DONTWAIT 1
#define FBZ_SNDMORE 2
/* ZMQ_HAUSNUMERO + 53: libzmq's own errno for a terminated context. */
#define FBZ_ETERM (156384712 + 53)

static int (*fbz_msg_init)(fb_zmq_msg_t *);
static int (*fbz_msg_init_size)(fb_zmq_msg_t *, size_t);
/* A message over a buffer it does not own: libzmq calls the function with `hint` when done. */
typedef void (fbz_free_fn)(void *data, void *hint);
static int (*fbz_msg_init_data)(fb_zmq_msg_t *, void *, size_t, fbz_free_fn *, void *);
static void *(*fbz_msg_data)(fb_zmq_msg_t *);
static size_t (*fbz_msg_size)(const fb_zmq_msg_t *);
static int (*fbz_msg_more)(const fb_zmq_msg_t *);
static int (*fbz_msg_close)(fb_zmq_msg_t *);
static int (*fbz_msg_copy)(fb_zmq_msg_t *, fb_zmq_msg_t *);
static int (*fbz_msg_move)(fb_zmq_msg_t *, fb_zmq_msg_t *);
static int (*fbz_msg_send)(fb_zmq_msg_t *, void *, int);
static int (*fbz_msg_recv)(fb_zmq_msg_t *, void *, int);
static int (*fbz_poll)(fb_zmq_pollitem_t *, int, long);
static int (*fbz_errno)(void);
/* Sockets of their own: the worker's compiled session opens, configures and closes its
 * DEALER without the GIL (reconnections included). */
static void *(*fbz_socket)(void *, int);
static int (*fbz_close)(void *);
static int (*fbz_connect)(void *, const char *);
static int (*fbz_setsockopt)(void *, int, const void *, size_t);

#define FBZ_RESOLVE(handle, var, name)                      \
    do {                                                    \
        *(void **)(&var) = dlsym(handle, name);             \
        if (var == NULL) return "libzmq symbol not found: " name; \
    } while (0)

/* Resolve every function through the already-loaded module at `path`.
 * Returns NULL on success, else a static message. */
static const char *fbz_load(const char *path)
{
    void *handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (handle == NULL) return "pyzmq's extension module is not loaded";
    FBZ_RESOLVE(handle, fbz_msg_init, "zmq_msg_init");
    FBZ_RESOLVE(handle, fbz_msg_init_size, "zmq_msg_init_size");
    FBZ_RESOLVE(handle, fbz_msg_init_data, "zmq_msg_init_data");
    FBZ_RESOLVE(handle, fbz_msg_data, "zmq_msg_data");
    FBZ_RESOLVE(handle, fbz_msg_size, "zmq_msg_size");
    FBZ_RESOLVE(handle, fbz_msg_more, "zmq_msg_more");
    FBZ_RESOLVE(handle, fbz_msg_close, "zmq_msg_close");
    FBZ_RESOLVE(handle, fbz_msg_copy, "zmq_msg_copy");
    FBZ_RESOLVE(handle, fbz_msg_move, "zmq_msg_move");
    FBZ_RESOLVE(handle, fbz_msg_send, "zmq_msg_send");
    FBZ_RESOLVE(handle, fbz_msg_recv, "zmq_msg_recv");
    FBZ_RESOLVE(handle, fbz_poll, "zmq_poll");
    FBZ_RESOLVE(handle, fbz_errno, "zmq_errno");
    FBZ_RESOLVE(handle, fbz_socket, "zmq_socket");
    FBZ_RESOLVE(handle, fbz_close, "zmq_close");
    FBZ_RESOLVE(handle, fbz_connect, "zmq_connect");
    FBZ_RESOLVE(handle, fbz_setsockopt, "zmq_setsockopt");
    /* The module stays loaded by pyzmq; our reference keeps it so. */
    return NULL;
}

#endif
