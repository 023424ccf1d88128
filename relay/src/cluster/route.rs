//! The gate's side: where a client's frame is applied (here, or at its session's home), and
//! sending it there.

use parley_protocol::data::data_sid;
use parley_protocol::payload::{MsgData, OpaqueData};
use parley_protocol::{Envelope, FrameError, FrameType};
use tokio_tungstenite::tungstenite::{Bytes, Utf8Bytes};

use super::wire::{NodeId, NodeMsg};
use super::{Cluster, MAX_ROUTES, new_sessions, store_unavailable};
use crate::cmd;
use crate::hub::{ConnState, Flow};
use crate::ids::{InviteCode, SessionId};
use crate::limiter::SharedLimit;
use crate::outbox::Frame;

/// Where a frame is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// By this node's hub: the session lives here, is new, has no live home (and this frame
    /// may re-create it here), or the frame will be refused anyway.
    Here,
    /// By the hub of the session's home, for a proxy of this client there.
    Home(NodeId),
}

impl Cluster {
    /// Applies one of a local client's frames, here or at its session's home.
    pub async fn dispatch(&self, conn: &mut ConnState, frame: &Utf8Bytes) -> Flow {
        let Ok(env) = Envelope::parse(frame.as_str()) else {
            return self.hub.handle(conn, frame); // which answers what is wrong with it
        };
        // A node that may have been counted dead acts for no session (see `holds_lease`).
        if !self.holds_lease() && !matches!(env.kind, FrameType::Ping | FrameType::Pong) {
            self.refuse(conn, &env, &store_unavailable());
            return Flow::default();
        }
        let shared_limit = match env.kind {
            FrameType::Join => Some(SharedLimit::JoinFailures),
            FrameType::CreateSession => Some(SharedLimit::SessionsCreated),
            _ => None,
        };
        if let Some(limit) = shared_limit
            && let Err(e) = self.check_shared(limit, conn.address).await
        {
            self.refuse(conn, &env, &e);
            return Flow::default();
        }
        let route = match self.route(conn, &env).await {
            Ok(route) => route,
            Err(e) => {
                self.refuse(conn, &env, &e);
                return Flow::default();
            }
        };
        match route {
            Route::Here => {
                match self.code_for(&env, conn.reserved_code.is_some()).await {
                    Ok(code) => conn.reserved_code = conn.reserved_code.or(code),
                    Err(e) => {
                        self.refuse(conn, &env, &e);
                        return Flow::default();
                    }
                }
                let recovering = match self.prepare(&env, conn.address).await {
                    Ok(recovering) => recovering,
                    Err(e) => {
                        self.refuse(conn, &env, &e);
                        return Flow::default();
                    }
                };
                let takes_seat = matches!(
                    env.kind,
                    FrameType::CreateSession | FrameType::Reattach | FrameType::Restore
                );
                let before = takes_seat.then(|| conn.memberships.clone());
                let flow = self.hub.handle_parsed(conn, &env, frame);
                if let Some(sid) = recovering {
                    self.hub.take_recovered(sid);
                }
                if let Some(before) = before {
                    // Before the answer can reach the client (this task writes it only after
                    // we return), so no other node can claim the session meanwhile.
                    self.claim_homes(&new_sessions(&before, conn)).await;
                }
                flow
            }
            Route::Home(node) => {
                let sid = env.sid().and_then(SessionId::parse);
                if let Err(e) = self.forward(conn, node, sid, Frame::Text(frame.clone())) {
                    self.refuse(conn, &env, &e);
                    return Flow::default();
                }
                self.forward_flow(conn.outbox.id())
            }
        }
    }

    fn refuse(&self, conn: &ConnState, env: &Envelope<'_>, e: &FrameError) {
        let msg_id = match env.kind {
            FrameType::Msg => env
                .data::<MsgData>()
                .ok()
                .and_then(|data| data.echoable_id()),
            _ => None,
        };
        conn.send_error(env.sid(), e, msg_id);
    }

    async fn route(&self, conn: &ConnState, env: &Envelope<'_>) -> Result<Route, FrameError> {
        match env.kind {
            FrameType::Join => self.route_join(conn, env).await,
            FrameType::Msg
            | FrameType::MsgRead
            | FrameType::InviteCreate
            | FrameType::JoinAccept
            | FrameType::JoinDeny
            | FrameType::Reattach
            | FrameType::Restore => {
                let Some(sid) = env.sid().and_then(SessionId::parse) else {
                    return Ok(Route::Here);
                };
                self.route_session(conn, Some(env), sid).await
            }
            _ => Ok(Route::Here),
        }
    }

    /// Applies one of a local client's `DATA` frames, here or at its session's home (as a
    /// `MSG` is: the same route, the same flow control; never through a mailbox).
    pub async fn dispatch_data(&self, conn: &mut ConnState, frame: Bytes) -> Flow {
        let Some(sid) = data_sid(&frame).map(SessionId) else {
            return self.hub.handle_data(conn, &frame); // which answers what is wrong with it
        };
        let refuse = |conn: &ConnState, e: &FrameError| {
            conn.send_error(Some(&sid.to_string()), e, None);
            Flow::default()
        };
        if !self.holds_lease() {
            return refuse(conn, &store_unavailable());
        }
        match self.route_session(conn, None, sid).await {
            Ok(Route::Here) => self.hub.handle_data(conn, &frame),
            Ok(Route::Home(node)) => {
                if let Err(e) = self.forward(conn, node, Some(sid), Frame::Binary(frame)) {
                    return refuse(conn, &e);
                }
                self.forward_flow(conn.outbox.id())
            }
            Err(e) => refuse(conn, &e),
        }
    }

    /// Where a frame for the session `sid` goes. `env` is the frame, if it is one that may
    /// take a seat (a `DATA` frame takes none).
    async fn route_session(
        &self,
        conn: &ConnState,
        env: Option<&Envelope<'_>>,
        sid: SessionId,
    ) -> Result<Route, FrameError> {
        if self.hub.holds_session(sid) {
            return Ok(Route::Here);
        }
        let (known, anything_remote) = match self.routes.get(&conn.outbox.id()) {
            Some(routes) => (
                routes
                    .sessions
                    .iter()
                    .find(|(s, _)| *s == sid)
                    .map(|(_, node)| *node),
                !routes.homes.is_empty(),
            ),
            None => (None, false),
        };
        if let Some(node) = known.filter(|n| self.is_alive(*n)) {
            return Ok(Route::Home(node));
        }
        // Only a frame that takes a seat (`REATTACH`, `RESTORE`) can make a connection a
        // member of a session held elsewhere, and a `JOIN` at another home, which leaves a
        // route: a connection with neither is a member nowhere but here, and its frame is
        // refused here without asking Redis (a client naming random sessions costs nothing).
        let takes_seat =
            env.is_some_and(|env| matches!(env.kind, FrameType::Reattach | FrameType::Restore));
        if !takes_seat && !anything_remote {
            return Ok(Route::Here);
        }
        let home = self.home_of(sid).await.map_err(|_| store_unavailable())?;
        let home = match home {
            Some(home) => home,
            None if env.is_some_and(|env| cmd::reattach::could_recreate(&self.hub, env)) => self
                .claim_home(sid)
                .await
                .map_err(|_| store_unavailable())?,
            None => return Ok(Route::Here),
        };
        Ok(if home == self.me {
            Route::Here
        } else {
            Route::Home(home)
        })
    }

    async fn route_join(&self, conn: &ConnState, env: &Envelope<'_>) -> Result<Route, FrameError> {
        // A rate-limited joiner, or a code that is not even a code, is refused here.
        if !self.hub.join_allowed(conn) {
            return Ok(Route::Here);
        }
        let Some(code) = env
            .data::<OpaqueData>()
            .ok()
            .and_then(|mut data| data.take_string("code").ok().flatten())
            .and_then(|code| InviteCode::parse(&code))
        else {
            return Ok(Route::Here);
        };
        if self.hub.holds_invite(code) {
            return Ok(Route::Here);
        }
        match self.issuer_of(code).await {
            Ok(Some(node)) if node != self.me => Ok(Route::Home(node)),
            Ok(_) => Ok(Route::Here),
            Err(_) => Err(store_unavailable()),
        }
    }

    /// Sends a client's frame to the session's home, remembering the route.
    fn forward(
        &self,
        conn: &ConnState,
        node: NodeId,
        sid: Option<SessionId>,
        frame: Frame,
    ) -> Result<(), FrameError> {
        let id = conn.outbox.id();
        {
            let mut routes = self.routes.entry(id).or_default();
            if let Some(sid) = sid
                && !routes.sessions.iter().any(|(s, _)| *s == sid)
                && routes.sessions.len() < MAX_ROUTES
            {
                routes.sessions.push((sid, node));
            }
            if !routes.homes.contains(&node) {
                routes.homes.push(node);
            }
        }
        let msg = NodeMsg::Frame {
            gate: self.me,
            conn: id,
            ip: conn.ip,
            frame,
        };
        if self.send(node, &msg) {
            self.forwarded(id);
            Ok(())
        } else {
            Err(store_unavailable())
        }
    }
}
