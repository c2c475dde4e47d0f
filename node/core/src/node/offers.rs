//! `[[services]]` between a node and its lighthouses: what this node
//! offers (advertised with each registration), and who offers what
//! (`tern services`, `tern kubeconfig`), asked of every registered
//! lighthouse and merged.

use std::collections::HashMap;

use tern_shared::control::{AdvertisedService, ServiceEntry, MAX_SERVICES_ADVERTISED};

use super::queries::FIND_RUNNERS_TIMEOUT;
use super::*;

/// What [`NodeCore::find_services`] learned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServicesResult {
    pub id: u32,
    pub services: Vec<ServiceEntry>,
    /// Lighthouses asked, and those that answered in time.
    pub asked: usize,
    pub answered: usize,
    /// Some lighthouse had more than fit in its answer.
    #[serde(default)]
    pub incomplete: bool,
}

pub(super) struct PendingServices {
    sent: Instant,
    waiting: Vec<u32>,
    asked: usize,
    services: Vec<ServiceEntry>,
    incomplete: bool,
}

/// This node's offers and the questions in flight.
#[derive(Default)]
pub(super) struct Offers {
    mine: Vec<AdvertisedService>,
    finds: HashMap<u32, PendingServices>,
}

impl NodeCore {
    /// The services this node offers, advertised to every lighthouse now
    /// and with each registration.
    pub fn set_services(&mut self, mut services: Vec<AdvertisedService>, now: Instant) {
        services.truncate(MAX_SERVICES_ADVERTISED);
        self.offers.mine = services;
        self.advertise_services(None, now);
    }

    /// Sends the offers to one lighthouse peer, or to all registered.
    pub(super) fn advertise_services(&mut self, only: Option<PeerId>, now: Instant) {
        if self.offers.mine.is_empty() {
            return;
        }
        let services = self.offers.mine.clone();
        for (peer, ip) in self
            .registered_lighthouses()
            .into_iter()
            .filter(|(p, _)| only.is_none_or(|o| o == *p))
        {
            let id = self.request_id();
            let msg = ControlMessage::ServicesAdvert {
                id,
                services: services.clone(),
            };
            self.send_control(peer, ip, &msg, now);
        }
    }

    /// `tern services`: asks every registered lighthouse who offers
    /// `name` (empty: anything). The merged answer comes out of
    /// [`NodeEvent::Services`] with the returned id once all have answered
    /// or [`FIND_RUNNERS_TIMEOUT`] passed.
    pub fn find_services(&mut self, name: &str, now: Instant) -> Result<u32, CoreError> {
        let waiting = self.ask_lighthouses(
            |request| ControlMessage::ServicesQuery {
                id: request,
                name: name.to_string(),
            },
            now,
        )?;
        let id = self.request_id();
        self.offers.finds.insert(
            id,
            PendingServices {
                sent: now,
                asked: waiting.len(),
                waiting,
                services: Vec::new(),
                incomplete: false,
            },
        );
        Ok(id)
    }

    pub(super) fn services_reply(
        &mut self,
        request: u32,
        services: Vec<ServiceEntry>,
        complete: bool,
    ) {
        let Some((&id, find)) = self
            .offers
            .finds
            .iter_mut()
            .find(|(_, f)| f.waiting.contains(&request))
        else {
            return;
        };
        find.waiting.retain(|&r| r != request);
        find.incomplete |= !complete;
        for s in services {
            if !find.services.contains(&s) {
                find.services.push(s);
            }
        }
        if find.waiting.is_empty() {
            self.finish_services(id);
        }
    }

    fn finish_services(&mut self, id: u32) {
        let Some(find) = self.offers.finds.remove(&id) else {
            return;
        };
        let mut services = find.services;
        services.sort();
        self.events.push(NodeEvent::Services(ServicesResult {
            id,
            services,
            asked: find.asked,
            answered: find.asked - find.waiting.len(),
            incomplete: find.incomplete,
        }));
    }

    pub(super) fn drive_service_finds(&mut self, now: Instant) {
        let late: Vec<u32> = self
            .offers
            .finds
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.sent) >= FIND_RUNNERS_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            self.finish_services(id);
        }
    }
}
