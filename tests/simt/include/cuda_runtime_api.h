#pragma once

#include "simt/api.h"
