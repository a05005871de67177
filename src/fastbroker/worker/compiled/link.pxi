# Included by worker/_session.pyx: a Session's connection to one broker (a Link, declared
# in _session.pxd), in C for the loop thread: connecting and reconnecting with back-off,
# READY and the credit, heartbeats both ways, the FBW01/FBW02 framing of TASK, CANCEL and
# DISCONNECT in and of ANSWER, FAILED, EXTEND and RETURN out. What the jobs are and who
# runs them is the Session's (its job table); a Link only reads messages into it and
# sends what its outbox holds. Every function runs on the loop thread, without the GIL.


cdef int _link_init(Link *k, int index, const char *address) noexcept nogil:
    memset(k, 0, sizeof(Link))
    k.index = index
    k.address = address
    k.announced = -1
    k.reconnect_at = -1.0
    k.quiet_at = -1.0
    return 0


cdef void _link_free(Link *k) noexcept nogil:
    free(k.outbox.items)
    free(k.unconfirmed.items)
    free(k.frames)
    free(k.out)
    free(k.returns)


cdef inline const char *_link_signature(Link *k) noexcept nogil:
    return WORKER_SIGNATURE_V2 if k.v2 else WORKER_SIGNATURE


# -- the connection -------------------------------------------------------------------------

cdef int _link_open(Session s, Link *k, double now) noexcept nogil:
    cdef int zero = 0
    k.sock = zsocket(s.context, _DEALER)
    if k.sock == NULL:
        return -1
    k.generation += 1
    k.orphans = k.in_hand
    # Abandoning a connection must not wait for it; the last close sets its own linger.
    zsetsockopt(k.sock, _LINGER, &zero, sizeof(int))
    if s.has_curve:
        zsetsockopt(k.sock, _CURVE_SECRETKEY, s.curve_secret_c, s.curve_sizes[0])
        zsetsockopt(k.sock, _CURVE_PUBLICKEY, s.curve_public_c, s.curve_sizes[1])
        zsetsockopt(k.sock, _CURVE_SERVERKEY, s.curve_server_c, s.curve_sizes[2])
    zconnect(k.sock, k.address)  # checked by Worker() already
    k.share = s._opening_share(k)  # what READY on the new connection offers
    k.spare_since = -1.0
    k.probing = 0
    k.heard = 0
    k.offered_v2 = 0
    k.last_heard = now  # the broker gets `silence` seconds to speak first
    k.next_heartbeat = now + s.heartbeat
    k.announced = -1
    k.reconnect_at = -1.0
    k.counters[N_CONNECTS] += 1
    if k.counters[N_CONNECTS] > 1:
        k.counters[N_RECONNECTS] += 1
    s._log(k.index, L_CONNECTING, k.generation, 0, NULL)
    return 0


cdef void _link_close_socket(Link *k, int linger_ms) noexcept nogil:
    if k.sock != NULL:
        zsetsockopt(k.sock, _LINGER, &linger_ms, sizeof(int))
        zclose(k.sock)
        k.sock = NULL


cdef void _link_register_again(Session s, Link *k) noexcept nogil:
    """DISCONNECT: the broker does not know this worker. Register again with READY
    on the same socket (see the pure Session); the jobs in hand become orphans."""
    k.generation += 1
    k.orphans = k.in_hand
    k.announced = -1
    k.share = s._opening_share(k)  # what the READY that registers it again offers
    k.spare_since = -1.0
    k.probing = 0
    _link_confirm(s, k)
    s._log(k.index, L_REGISTERING, 0, 0, NULL)


cdef void _link_lose(Session s, Link *k, double now) noexcept nogil:
    """Drop the connection and schedule the next: at once after one loss, then
    heartbeat/2 doubling up to reconnect_max while the broker stays silent."""
    cdef double delay = 0.0, silent = now - k.last_heard
    cdef int i, slot
    _link_close_socket(k, 0)
    k.spare_since = -1.0  # the share is told again on the next connection
    # ANSWERs not confirmed may have been discarded with the socket's queue.
    i = k.unconfirmed.count - 1
    while i >= 0:
        slot = <int>_ring_at(&k.unconfirmed, i)
        s.slots[slot].state = S_OUTBOX
        _ring_push_front(&k.outbox, slot)
        i -= 1
    k.unconfirmed.count = 0
    if k.failures:
        delay = s.heartbeat / 2 * (1 << min(k.failures - 1, 30))
        if delay > s.reconnect_max:
            delay = s.reconnect_max
    k.failures += 1
    k.reconnect_at = now + delay
    s._log(k.index, L_RECONNECTING, delay, silent, NULL)
    if not k.heard and s.worker_protocol == 2:
        # Perhaps the broker does not know FBW02: the next connection tries the other.
        # The outbox holds outcomes, not messages: they are written in the protocol of
        # the moment they are sent.
        k.v2 = not k.v2
        s._log(k.index, L_TRYING_V2 if k.v2 else L_TRYING_V1, 0, 0, NULL)


cdef int _link_turn(Session s, Link *k, double now) noexcept nogil:
    """The link's share of a loop turn: reconnect when due, give back, READY, send what
    is waiting, heartbeats both ways. -1 when the context is gone."""
    if k.sock == NULL and k.reconnect_at >= 0 and now >= k.reconnect_at:
        if _link_open(s, k, now) < 0:
            return -1
    if k.sock == NULL:
        return 0
    if k.returns_count:
        _link_give_back(s, k, now)
    # READY first on a new connection (the broker answers anything else from an unknown
    # worker with DISCONNECT), and READY(0) or a lowered share before the answers (else
    # the broker would refill what they free); a raised one after.
    if s.stopping or k.announced < 0 or (s.has_limit and k.share < k.announced):
        _link_announce_credit(s, k, now)
    _link_flush(s, k, now)
    _link_announce_credit(s, k, now)
    _link_offer_v2(s, k, now)
    if now - k.last_heard > s.silence:
        _link_lose(s, k, now)
    elif now >= k.next_heartbeat:
        _link_send_small(s, k, now, _link_signature(k), CMD_HEARTBEAT, NULL, 0)
        k.counters[N_HEARTBEATS_SENT] += 1
        k.next_heartbeat = now + s.heartbeat
    return 0


cdef double _link_due(Session s, Link *k, double now) noexcept nogil:
    """When the link next needs the loop without a message (-1: never)."""
    cdef double due = -1.0
    if k.sock != NULL:
        due = k.next_heartbeat
        if k.last_heard + s.silence < due:
            due = k.last_heard + s.silence
    elif k.reconnect_at >= 0:
        due = k.reconnect_at
    if k.quiet_at >= 0 and now < k.quiet_at and (due < 0 or k.quiet_at < due):
        due = k.quiet_at
    return due


cdef int _link_finished(Link *k, double now) noexcept nogil:
    """Nothing left to send to this broker, and the grace for jobs racing READY(0)
    has passed (the Session checks that no job is in hand)."""
    if k.sock == NULL:
        return 1
    return k.outbox.count == 0 and (k.quiet_at < 0 or now >= k.quiet_at)


cdef void _link_hang_up(Session s, Link *k) noexcept nogil:
    """The end of a graceful stop: deliver what is left, say DISCONNECT, close."""
    cdef int i, answers = 0, dropped
    cdef double now
    for i in range(k.outbox.count):
        if s.slots[<int>_ring_at(&k.outbox, i)].kind == K_ANSWER:
            answers = 1
    if k.sock == NULL and answers:
        # Answers finished while away: one last connection to deliver them.
        _link_open(s, k, _now())
    if k.sock == NULL:
        _link_drop_outbox(s, k)
        s._log(k.index, L_STOPPED_AWAY, 0, 0, NULL)
        return
    now = _now()
    _link_announce_credit(s, k, now)
    _link_flush(s, k, now)
    dropped = k.outbox.count
    _link_send_small(s, k, now, _link_signature(k), CMD_DISCONNECT, NULL, 0)
    # Bounded: a vanished broker must not keep the process alive.
    _link_close_socket(k, s.linger_ms)
    _link_drop_outbox(s, k)
    if dropped:
        s._log(k.index, L_DROPPED, dropped, 0, NULL)
    s._log(k.index, L_DISCONNECTED, 0, 0, NULL)


cdef void _link_announce_credit(Session s, Link *k, double now) noexcept nogil:
    """READY when the credit the broker should use changes (see the pure Session)."""
    cdef int credit = 0
    cdef uint8_t body[4]
    if s.stopping:
        credit = 0
    elif s.has_limit:
        credit = k.share
    else:
        credit = s.limit - k.orphans
        if credit < 0:
            credit = 0
    if credit == k.announced:
        return
    body[0] = (credit >> 24) & 0xFF
    body[1] = (credit >> 16) & 0xFF
    body[2] = (credit >> 8) & 0xFF
    body[3] = credit & 0xFF
    if _link_send_small(s, k, now, _link_signature(k), CMD_READY, body, 4):
        k.announced = credit
        if s.stopping and k.quiet_at < 0:
            k.quiet_at = now + s.stop_grace


cdef void _link_offer_v2(Session s, Link *k, double now) noexcept nogil:
    """On an FBW01 connection of an FBW02 worker: offer FBW02 once (see the pure Session)."""
    cdef uint8_t body[4]
    if k.v2 or s.worker_protocol != 2 or k.offered_v2 or s.stopping:
        return
    if not k.heard or k.announced <= 0:
        return
    body[0] = (k.announced >> 24) & 0xFF
    body[1] = (k.announced >> 16) & 0xFF
    body[2] = (k.announced >> 8) & 0xFF
    body[3] = k.announced & 0xFF
    if _link_send_small(s, k, now, WORKER_SIGNATURE_V2, CMD_READY, body, 4):
        k.offered_v2 = 1


cdef void _link_give_back(Session s, Link *k, double now) noexcept nogil:
    """RETURN the jobs that came beyond the credit (several brokers), as many messages as
    PEER_MAX_FRAMES needs. The broker then takes this worker for full (share 0): it has
    jobs queued, so it is told a share again in its turn (Session._share_credit)."""
    cdef int slot, i, at = 0, n
    cdef Slot *o
    global _out_of_memory
    k.counters[N_RETURNED] += k.returns_count
    pthread_mutex_lock(&s.lock)
    while at < k.returns_count:
        n = min(k.returns_count - at, PEER_MAX_FRAMES - 3)  # and [b"", signature, RETURN]
        slot = s._new_slot()
        if slot < 0:
            break
        o = &s.slots[slot]
        o.frames = <zmsg *>malloc(n * sizeof(zmsg))
        if o.frames == NULL:
            _out_of_memory = 1
            s._free_slot(slot)
            break
        for i in range(n):
            _put_bytes(&o.frames[i], k.returns + (at + i) * 16, 16)
        o.nframes = n
        o.kind = K_RETURN
        o.link = k.index
        o.generation = k.generation
        o.state = S_OUTBOX
        _ring_push(&k.outbox, slot)
        at += n
    pthread_mutex_unlock(&s.lock)
    k.returns_count = 0
    _link_flush(s, k, now)
    k.share = 0
    k.announced = 0
    k.spare_since = -1.0
    k.probing = 0


cdef void _link_drop_outbox(Session s, Link *k) noexcept nogil:
    """The end: what is left to send (or to send again) is not sent any more; let the
    answers go (the Worker keeps its sessions)."""
    pthread_mutex_lock(&s.lock)
    while k.outbox.count:
        s._free_slot(<int>_ring_pop(&k.outbox))
    while k.unconfirmed.count:
        s._free_slot(<int>_ring_pop(&k.unconfirmed))
    pthread_mutex_unlock(&s.lock)


cdef void _link_confirm(Session s, Link *k) noexcept nogil:
    """The broker spoke: the ANSWERs sent before have reached it."""
    if not k.unconfirmed.count:
        return
    pthread_mutex_lock(&s.lock)
    while k.unconfirmed.count:
        s._free_slot(<int>_ring_pop(&k.unconfirmed))
    pthread_mutex_unlock(&s.lock)


# -- sending -----------------------------------------------------------------------------------

cdef int _link_out_room(Link *k, int n) noexcept nogil:
    cdef zmsg *grown
    global _out_of_memory
    if n <= k.out_cap:
        return 0
    grown = <zmsg *>realloc(k.out, n * sizeof(zmsg))
    if grown == NULL:
        _out_of_memory = 1
        return -1
    k.out = grown
    k.out_cap = n
    return 0


cdef void _link_out_head(Link *k, const char *signature, int command) noexcept nogil:
    cdef uint8_t byte = command
    zmsg_init(&k.out[0])
    _put_bytes(&k.out[1], signature, SIGNATURE_SIZE)
    _put_bytes(&k.out[2], &byte, 1)


cdef int _link_send_small(Session s, Link *k, double now, const char *signature, int command,
                          const void *body, size_t size) noexcept nogil:
    """[b"", signature, command] and one body frame of `size` bytes if `body`."""
    if _link_out_room(k, 4) < 0:
        return 0
    _link_out_head(k, signature, command)
    if body == NULL:
        return _link_send_frames(s, k, now, 3)
    _put_bytes(&k.out[3], body, size)
    return _link_send_frames(s, k, now, 4)


cdef int _link_send_frames(Session s, Link *k, double now, int n) noexcept nogil:
    """Send `out[:n]` without blocking (consuming them); 0 when the socket's queue is
    full. Only the first frame can meet a full queue (libzmq counts whole messages
    against the high-water mark), so a message goes whole or not at all."""
    cdef int i
    for i in range(n):
        if zmsg_send(&k.out[i], k.sock, ZDONTWAIT | (ZSNDMORE if i < n - 1 else 0)) < 0:
            if zerrno() == ZETERM:
                s.terminated = 1
            _close_all(&k.out[i], n - i)
            return 0
    # Any message tells the broker we are alive: the heartbeat can wait.
    k.next_heartbeat = now + s.heartbeat
    return 1


cdef void _link_flush(Session s, Link *k, double now) noexcept nogil:
    cdef int slot
    cdef Slot *o
    while k.outbox.count and k.sock != NULL:
        slot = <int>_ring_at(&k.outbox, 0)
        o = &s.slots[slot]
        if o.kind != K_ANSWER and o.generation != k.generation:
            # The broker re-queues the jobs of a connection it lost; a FAILED on a
            # new one would count a second try.
            _ring_pop(&k.outbox)
            s._lock_free_slot(slot)
            continue
        if o.kind == K_ANSWER and k.v2:
            if not _link_flush_answers(s, k, now):
                return  # full: the poll waits for POLLOUT
        elif not _link_flush_one(s, k, now, slot):
            return


cdef int _link_flush_answers(Session s, Link *k, double now) noexcept nogil:
    """The ANSWERs at the head of the outbox as one FBW02 ANSWER (at most MAX_BATCH
    records and PEER_MAX_FRAMES frames); they stay in their slots until confirmed."""
    cdef int n = 0, frames = 4, i, j, at, slot, _
    cdef Slot *o
    cdef uint8_t *header
    global _out_of_memory
    while n < k.outbox.count and n < MAX_BATCH:
        o = &s.slots[<int>_ring_at(&k.outbox, n)]
        if o.kind != K_ANSWER or (n and frames + o.nframes > PEER_MAX_FRAMES):
            break
        frames += o.nframes
        n += 1
    if _link_out_room(k, frames) < 0:
        return 0
    _link_out_head(k, WORKER_SIGNATURE_V2, CMD_ANSWER)
    if zmsg_init_size(&k.out[3], n * ANSWER_RECORD_SIZE) != 0:
        _close_all(k.out, 3)
        _out_of_memory = 1
        return 0
    header = <uint8_t *>zmsg_data(&k.out[3])
    at = 4
    for i in range(n):
        o = &s.slots[<int>_ring_at(&k.outbox, i)]
        memcpy(header + i * ANSWER_RECORD_SIZE, o.task_id, 16)
        header[i * ANSWER_RECORD_SIZE + 16] = R_OK
        header[i * ANSWER_RECORD_SIZE + 17] = (o.nframes >> 8) & 0xFF
        header[i * ANSWER_RECORD_SIZE + 18] = o.nframes & 0xFF
        for j in range(o.nframes):
            zmsg_init(&k.out[at])
            zmsg_copy(&k.out[at], &o.frames[j])
            at += 1
    if not _link_send_frames(s, k, now, at):
        return 0
    for _ in range(n):
        slot = <int>_ring_pop(&k.outbox)
        s.slots[slot].state = S_SENT
        _ring_push(&k.unconfirmed, slot)
    return 1


cdef int _link_flush_one(Session s, Link *k, double now, int slot) noexcept nogil:
    """One FBW01 ANSWER (kept until confirmed), or a FAILED, EXTEND or RETURN (either
    protocol): [b"", signature, command, task id, frames...] (RETURN: no task id)."""
    cdef Slot *o = &s.slots[slot]
    cdef int first = 3 if o.kind == K_RETURN else 4
    cdef int n = first + o.nframes, j, command
    if o.kind == K_ANSWER:
        command = CMD_ANSWER
    elif o.kind == K_FAILED:
        command = CMD_FAILED
    elif o.kind == K_EXTEND:
        command = CMD_EXTEND
    else:
        command = CMD_RETURN
    if _link_out_room(k, n) < 0:
        return 0
    _link_out_head(k, _link_signature(k), command)
    if o.kind != K_RETURN:
        _put_bytes(&k.out[3], o.task_id, 16)
    for j in range(o.nframes):
        zmsg_init(&k.out[first + j])
        zmsg_copy(&k.out[first + j], &o.frames[j])
    if not _link_send_frames(s, k, now, n):
        return 0
    _ring_pop(&k.outbox)
    if o.kind == K_ANSWER:
        o.state = S_SENT
        _ring_push(&k.unconfirmed, slot)
    else:
        s._lock_free_slot(slot)
    return 1


# -- receiving ---------------------------------------------------------------------------------

cdef void _link_receive(Session s, Link *k) noexcept nogil:
    cdef int _, n
    for _ in range(RECV_BATCH):  # bounded, so results, timers and the other links get their turn
        if k.sock == NULL:
            return
        n = _link_recv_message(s, k)
        if n < 0:
            return
        _link_handle(s, k, n)
        _close_all(k.frames, n)


cdef int _link_recv_message(Session s, Link *k) noexcept nogil:
    """The next message's frames into `frames`; its frame count, or -1 if none."""
    cdef int n = 0
    cdef zmsg *grown
    global _out_of_memory
    while True:
        if n == k.frames_cap:
            grown = <zmsg *>realloc(k.frames, (k.frames_cap * 2 + 16) * sizeof(zmsg))
            if grown == NULL:
                _out_of_memory = 1
                _close_all(k.frames, n)
                return -1
            k.frames = grown
            k.frames_cap = k.frames_cap * 2 + 16
        zmsg_init(&k.frames[n])
        if zmsg_recv(&k.frames[n], k.sock, ZDONTWAIT) < 0:
            if zerrno() == ZETERM:
                s.terminated = 1
            zmsg_close(&k.frames[n])
            if n:  # cannot happen: the parts of a message arrive together
                _close_all(k.frames, n)
            return -1
        n += 1
        if not zmsg_more(&k.frames[n - 1]):
            return n


cdef void _link_handle(Session s, Link *k, int n) noexcept nogil:
    cdef int command = -1, v2_message
    cdef const char *signature
    k.last_heard = _now()
    _link_confirm(s, k)
    if n < 3 or zmsg_size(&k.frames[0]) != 0 or zmsg_size(&k.frames[1]) != SIGNATURE_SIZE:
        return
    signature = <const char *>zmsg_data(&k.frames[1])
    if memcmp(signature, WORKER_SIGNATURE_V2, SIGNATURE_SIZE) == 0:
        v2_message = 1
    elif memcmp(signature, WORKER_SIGNATURE, SIGNATURE_SIZE) == 0:
        v2_message = 0
    else:
        return
    if zmsg_size(&k.frames[2]) == 1:
        command = (<uint8_t *>zmsg_data(&k.frames[2]))[0]
    if v2_message and not k.v2:
        s._log(k.index, L_SPEAKS_V2, 0, 0, NULL)
        k.v2 = 1
    if command == CMD_DISCONNECT:
        k.counters[N_DISCONNECTS] += 1
        _link_register_again(s, k)
        return
    if not k.heard:
        # Not on DISCONNECT: a broker that keeps refusing us must meet the back-off.
        k.heard = 1
        k.failures = 0
        s._log(k.index, L_CONNECTED, 0, 0, NULL)
    if command == CMD_TASK and v2_message:
        _link_start_jobs(s, k, n)
    elif command == CMD_TASK:
        if n < 4 or zmsg_size(&k.frames[3]) != 16:
            k.counters[N_IGNORED] += 1
            s._log(k.index, L_TASK_NO_ID, 0, 0, NULL)
            return
        pthread_mutex_lock(&s.lock)
        s._start_job(k, <const uint8_t *>zmsg_data(&k.frames[3]), 4, n - 4)
        pthread_mutex_unlock(&s.lock)
    elif command == CMD_CANCEL:
        if n != 4:
            k.counters[N_IGNORED] += 1
        elif zmsg_size(&k.frames[3]) == 16:  # else not an id this worker was given
            s._cancel(k, <const uint8_t *>zmsg_data(&k.frames[3]))
    elif command != CMD_HEARTBEAT:
        k.counters[N_IGNORED] += 1


cdef void _link_start_jobs(Session s, Link *k, int n) noexcept nogil:
    """An FBW02 TASK: [b"", signature, TASK, payload frames..., header]; the header
    checked whole before any job starts."""
    cdef int body = n - 4, records, i, at = 3, count
    cdef const uint8_t *header
    cdef size_t size = zmsg_size(&k.frames[n - 1]) if n > 3 else 0
    if n < 4 or size == 0 or size % TASK_RECORD_SIZE or size // TASK_RECORD_SIZE > MAX_BATCH:
        k.counters[N_IGNORED] += 1
        s._log(k.index, L_BAD_TASK, n - 3, 0, NULL)
        return
    header = <const uint8_t *>zmsg_data(&k.frames[n - 1])
    records = size // TASK_RECORD_SIZE
    count = 0
    for i in range(records):
        at = (header[i * TASK_RECORD_SIZE + 16] << 8) | header[i * TASK_RECORD_SIZE + 17]
        count += at
        if at == 0 or count > body:  # checked as it goes: the sum never overflows
            break
    if count != body or at == 0:
        k.counters[N_IGNORED] += 1
        s._log(k.index, L_BAD_TASK, n - 3, 0, NULL)
        return
    at = 3
    pthread_mutex_lock(&s.lock)
    for i in range(records):
        count = (header[i * TASK_RECORD_SIZE + 16] << 8) | header[i * TASK_RECORD_SIZE + 17]
        s._start_job(k, header + i * TASK_RECORD_SIZE, at, count)
        at += count
    pthread_mutex_unlock(&s.lock)


cdef int _link_hold_back(Link *k, const uint8_t *task_id) noexcept nogil:
    """A job that came beyond the credit: keep its id to give it back (RETURN)."""
    cdef uint8_t *grown
    global _out_of_memory
    if k.returns_count == k.returns_cap:
        grown = <uint8_t *>realloc(k.returns, (k.returns_cap * 2 + 16) * 16)
        if grown == NULL:
            _out_of_memory = 1
            return -1
        k.returns = grown
        k.returns_cap = k.returns_cap * 2 + 16
    memcpy(k.returns + k.returns_count * 16, task_id, 16)
    k.returns_count += 1
    return 0
